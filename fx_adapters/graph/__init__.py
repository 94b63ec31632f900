"""The method-agnostic compiler: capture a model as a flat ``torch.fx`` graph (``capture``, ``capture_cache``),
find its layers (``match``), tag what a method inserts (``tags``), run passes (``passes``), copy and rewire graph
modules (``graph_module``), generate with KV caches (``generation``), read and write PEFT's files
(``peft_files``), handle bitsandbytes layers (``bnb``) and ``torch.compile`` (``torch_compile``).

Nothing here imports a method (``fx_adapters.road``, ``fx_adapters.xlora``) or the command line.
"""
