"""The one training loop (``tunelab.train.loop.train``) and the numerics it shares with evaluation."""
