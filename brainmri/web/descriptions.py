"""What each class is called on the pages, and a short plain-language description of it.

The descriptions say what the class is, not what to do about it: no treatment or prognosis
advice, because the page is read next to a model's guess, not a clinician's report. The API keeps
the machine names (`glioma`, `no_tumor`, ...); only the pages use these texts.
"""

from __future__ import annotations

__all__ = ["CLASS_DESCRIPTIONS", "CLASS_NAMES"]

CLASS_NAMES = {
    "glioma": "Glioma",
    "meningioma": "Meningioma",
    "no_tumor": "No tumor",
    "pituitary": "Pituitary tumor",
}

CLASS_DESCRIPTIONS = {
    "glioma": (
        "A glioma is a tumor that starts in the glial cells, which support and protect the "
        "nerve cells of the brain and spinal cord. Gliomas range from slow-growing to "
        "fast-growing types; an MRI slice alone cannot tell which."
    ),
    "meningioma": (
        "A meningioma grows from the meninges, the membranes that wrap the brain and spinal "
        "cord, so it usually sits at the edge of the brain rather than inside it. Most "
        "meningiomas are slow-growing and not cancerous."
    ),
    "no_tumor": (
        "The model found none of the three tumor types it was trained on in this slice. It was "
        "not trained to recognise any other condition, and one slice can miss a lesion that "
        "other slices show."
    ),
    "pituitary": (
        "A pituitary tumor grows in the pituitary gland, the small hormone-making gland at the "
        "base of the brain behind the nose. Most are benign (not cancerous) adenomas."
    ),
}
