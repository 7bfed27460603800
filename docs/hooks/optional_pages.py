"""MkDocs hook: pages another part of the project writes join the nav once they exist.

A nav entry for a missing page fails `mkdocs build --strict`, so pages that arrive with other
work (the study view's docs/studies.md) are listed here instead of in mkdocs.yml and added to
the nav, after the page named, only when their file is there.
"""

from __future__ import annotations

from pathlib import Path

# (title, file under docs/, the nav title it follows)
OPTIONAL_PAGES = [("Studies", "studies.md", "Using the pages")]


def on_config(config):
    """Insert each optional page that exists into the nav."""
    nav = config.get("nav")
    if not nav:
        return config
    docs_dir = Path(config["docs_dir"])
    listed = {str(value) for entry in nav if isinstance(entry, dict) for value in entry.values()}
    for title, page, after in OPTIONAL_PAGES:
        if not (docs_dir / page).is_file() or page in listed:
            continue
        titles = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in nav]
        position = titles.index(after) + 1 if after in titles else len(nav)
        nav.insert(position, {title: page})
    return config
