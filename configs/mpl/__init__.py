"""Meta Pseudo Labels configs (trainer 'mpl', trainers/meta_pseudo_labels.py) and the
supervised baseline on the same labels."""
