"""Training and checking vitlens' demo model on generated scenes."""

from vitlens_server.training.accuracy import scene_accuracy

__all__ = ["scene_accuracy"]
