"""Weight loaders: turn a local model source into ``(hf_name, tensor)`` pairs.

Names are HF transformers parameter names for every format, so model code has one mapping to
maintain. Random ("dummy") weights are the model code's business, not a loader's.

The package itself imports nothing: the frontend resolves models and reads their configs
(``source``, ``config``) without paying for torch; ``weights`` is where tensors come in.
"""
