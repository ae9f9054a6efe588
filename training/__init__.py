"""The machinery `train.py`'s loop stands on: ahead-of-time compilation of the per-bucket steps
(`compilation`), verified checkpoints (`checkpoints`) and clean stops (`stop`). It takes any train
state and any bucket plan and reads no config."""
