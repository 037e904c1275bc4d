"""llmquant's built-in algorithm plugins, installed as ``llmquant_plugins`` and discovered
through the ``llmquant`` entry-point group exactly as third-party plugins are."""
