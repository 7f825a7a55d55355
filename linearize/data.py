"""Text that exists on every Python install, for offline perplexity checks and demos."""

from __future__ import annotations


def builtin_text() -> str:
    """English prose from CPython's own documentation (`pydoc_data.topics`, ~465k characters)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))
