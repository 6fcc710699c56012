"""Subcommands of the ``vlcal`` console script (see ``vlcal_verl.cli``)."""
