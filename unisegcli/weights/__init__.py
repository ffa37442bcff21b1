"""The weights lifecycle: model cards and the registry, the cache, the downloader, imported
models, safe loading of checkpoint files, and the resolver that turns a --model name into a card."""
