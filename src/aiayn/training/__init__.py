"""Training: the paper's loss and step (train.py), the loop (loop.py), recipes and the command line
(recipe.py), optimizers and schedules (optim.py), training compute (compute.py)."""
