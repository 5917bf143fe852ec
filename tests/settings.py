"""Test settings: the real settings, pointed at a throwaway data directory.

Set before lazycat.settings is imported, so every path (SQLite, the Redis socket, the box key)
lands in a temporary directory that the session fixture in conftest.py removes at the end.
"""

import os
import tempfile

os.environ.setdefault("LAZYCAT_DATA_DIR", tempfile.mkdtemp(prefix="lazycat-test-"))
os.environ.setdefault("LAZYCAT_RELAYS", "home=203.0.113.10:3478")

from lazycat.settings import *  # noqa: F403

# Fast password hashing: the tests create many users; the hasher is Django's to get right.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES["staticfiles"] = {  # noqa: F405
    "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
}
WHITENOISE_USE_FINDERS = True  # serve static/ directly: the tests do not run collectstatic
STATIC_ROOT.mkdir(exist_ok=True)  # noqa: F405
