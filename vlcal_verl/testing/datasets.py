"""Test-only verl dataset classes (``data.custom_cls``), for the failure paths of the trainer's guards.

:class:`ImageDroppingDataset` is the custom dataset a user might write that loses the images on the way to
the rollout: its rows keep their ``images`` column (so the data *has* images), but the chat messages it
hands verl's agent loop hold only the text. verl then trains the vision-language model text-only, without
a word; the trainer's image guard (``VLCalTrainer._vlcal_check_images``) must stop it at step 1.
"""

from __future__ import annotations

from verl.utils.dataset.rl_dataset import RLHFDataset


class ImageDroppingDataset(RLHFDataset):
    """verl's dataset, minus the image parts of every message (the text parts are kept as they are)."""

    def _build_messages(self, example: dict, key: str) -> list:
        messages = super()._build_messages(example, key)
        for message in messages:
            if isinstance(message.get("content"), list):
                message["content"] = [c for c in message["content"] if c.get("type") != "image"]
        return messages
