"""Drop-in integrations with other training stacks.

- :mod:`rpg_kernels.integrations.hf`: completion hidden states and LM-head parameters of transformers models.
- :mod:`rpg_kernels.integrations.trl`: ``RPGGRPOTrainer``, TRL's ``GRPOTrainer`` with the fused RPG loss
  (needs trl).
- :mod:`rpg_kernels.integrations.verl`: policy losses with verl's signature, registered in verl's registry
  when verl is installed.

Submodules are imported on demand so that this package imports without trl or verl.
"""
