"""slimtune inside other training frameworks (imported on demand: the library does not need
them). :mod:`slimtune.integrations.transformers`: Hugging Face ``Trainer``."""
