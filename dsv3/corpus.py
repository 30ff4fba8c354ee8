"""The text every machine has offline: the ~460 KB of English reference docs CPython ships in
`pydoc_data.topics`. The demo model trains on it; the shipped evaluation tasks are built from its held-out part.

One split, defined here only: topics sorted by name, every 10th one (index % 10 == 9) held out. The content
depends on the Python version, so anything derived from it is built at run time, never shipped.
"""

HELDOUT_EVERY = 10


def pydoc_topics() -> dict[str, str]:
    import pydoc_data.topics

    return dict(sorted(pydoc_data.topics.topics.items()))


def pydoc_split() -> tuple[str, str]:
    """(train text, held-out text): whole topics joined by blank lines, deterministic for a Python version."""
    train, heldout = [], []
    for i, text in enumerate(pydoc_topics().values()):
        (heldout if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else train).append(text.strip())
    return "\n\n".join(train), "\n\n".join(heldout)
