"""The text every machine has offline: the ~460 KB of English reference docs CPython ships in
`pydoc_data.topics`. The demo model trains on it; the shipped evaluation tasks are built from its held-out part.

One split, defined here only: the topics sorted by name, cut into paragraphs (blank-line separated), and every
10th paragraph (index % 10 == 9) held out; about 10% of the text. The content
depends on the Python version, so anything derived from it is built at run time, never shipped.
"""

HELDOUT_EVERY = 10


def pydoc_topics() -> dict[str, str]:
    import pydoc_data.topics

    return dict(sorted(pydoc_data.topics.topics.items()))


def pydoc_split() -> tuple[str, str]:
    """(train text, held-out text): paragraphs joined by blank lines, deterministic for a Python version."""
    paragraphs = [p.strip() for text in pydoc_topics().values() for p in text.split("\n\n") if p.strip()]
    train = [p for i, p in enumerate(paragraphs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [p for i, p in enumerate(paragraphs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return "\n\n".join(train), "\n\n".join(heldout)
