from rayad.train.loop import fit, train_step

__all__ = ["fit", "train_step"]
