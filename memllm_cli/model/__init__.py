"""Models: the training-free engine over any HF decoder, the official trained checkpoints in
plain torch, where their parts go, and how they are found and loaded."""
