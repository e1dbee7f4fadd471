"""One CCA run on one model: the base model (model.py), its engines and weight syncing
(engines.py), the stage keys (keys.py), the shared stages and the whole run (run.py), the update
stages (updates.py) and the evaluation stages (evaluate.py)."""
