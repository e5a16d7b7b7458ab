"""rpg_train: a slim DDP trainer for the RPG losses (`python -m rpg_train --preset tiny`, docs/TRAINING.md).

Entry points: ``rpg_train.config.build_config`` and ``rpg_train.train.train``.
"""
