"""tunelab: fine-tuning research on language models — many methods, one training loop, one evaluation harness.

Quick use::

    from tunelab.config import load_config
    from tunelab.train.loop import train
    result = train(load_config("configs/lora-arith.yaml"))
"""

__version__ = "0.1.0"
