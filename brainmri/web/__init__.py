"""The Flask side: pages, JSON API, uploads, security, errors, rate limits, logs and metrics.

The only room that imports Flask. It sits on `inference` and `imaging` and nothing below
imports it; `brainmri.create_app` wires these modules into the app.
"""

from . import api
from . import descriptions
from . import errors
from . import logformat
from . import logs
from . import metrics
from . import models
from . import ratelimit
from . import security
from . import studies
from . import uploads
from . import views
from .models import EXTENSION_KEY
from .models import REGISTRY_KEY
from .uploads import ALLOWED_EXTENSIONS

__all__ = [
    "ALLOWED_EXTENSIONS",
    "EXTENSION_KEY",
    "REGISTRY_KEY",
    "api",
    "descriptions",
    "errors",
    "logformat",
    "logs",
    "metrics",
    "models",
    "ratelimit",
    "security",
    "studies",
    "uploads",
    "views",
]
