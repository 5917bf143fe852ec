"""lazycat settings: every knob comes from the environment, validated here at start-up.

The documented list lives in deploy/lazycat.env.example. A value that cannot be used stops the
process with a message that names the variable and says what it expects, so a typo in an env file
never turns into a half-working box.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from transport.bundle import BundleError, parse_relays

BASE_DIR = Path(__file__).resolve().parent.parent


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _env_bool(name: str, default: bool) -> bool:
    raw = _env(name).lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r}: expected true or false")


def _env_int(name: str, default: int, minimum: int, maximum: int) -> int:
    raw = _env(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r}: expected a whole number") from None
    if not minimum <= value <= maximum:
        raise ImproperlyConfigured(f"{name}={value}: expected {minimum}..{maximum}")
    return value


def _env_secret(name: str) -> str:
    """A secret from NAME or from the file NAME_FILE names (systemd credentials, docker secrets)."""
    path = _env(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={path}: cannot read it ({exc})") from None
    return _env(name)


def _listen(raw: str, name: str = "LAZYCAT_LISTEN", port_example: int = 8470) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ImproperlyConfigured(
            f"{name}={raw!r}: expected host:port, "
            f"e.g. 127.0.0.1:{port_example} or [::]:{port_example}"
        )
    return host, int(port)


DATA_DIR = Path(_env("LAZYCAT_DATA_DIR") or Path.home() / ".local/share/lazycat").resolve()
try:
    DATA_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
except OSError as exc:
    raise ImproperlyConfigured(
        f"LAZYCAT_DATA_DIR={DATA_DIR}: cannot create it ({exc}); point it at a writable directory"
    ) from None


def _data_dir_secret() -> str:
    """The Django secret key, made once and kept 0600 in the data directory."""
    path = DATA_DIR / "secret_key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = _env_secret("LAZYCAT_SECRET_KEY") or _data_dir_secret()
DEBUG = _env_bool("LAZYCAT_DEBUG", False)

LISTEN_HOST, LISTEN_PORT = _listen(_env("LAZYCAT_LISTEN", "127.0.0.1:8470"))
ALLOWED_HOSTS = [
    h.strip()
    for h in _env("LAZYCAT_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",")
    if h.strip()
]
if LISTEN_HOST not in {"0.0.0.0", "::"} and LISTEN_HOST not in ALLOWED_HOSTS:  # noqa: S104
    ALLOWED_HOSTS.append(f"[{LISTEN_HOST}]" if ":" in LISTEN_HOST else LISTEN_HOST)

# HTTPS: set when the console is served behind TLS (a reverse proxy or a tunnel).
HTTPS = _env_bool("LAZYCAT_HTTPS", False)
# A reverse proxy in front sets X-Forwarded-For/-Proto; only then are those headers believed.
BEHIND_PROXY = _env_bool("LAZYCAT_BEHIND_PROXY", False)
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_SSL_REDIRECT = HTTPS
SECURE_HSTS_SECONDS = 31536000 if HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
SECURE_HSTS_PRELOAD = False
# HSTS preload is for public sites on a domain their owner controls for good; a home box's
# hostname is not one, and a preload entry cannot be taken back quickly.
SILENCED_SYSTEM_CHECKS = ["security.W021"]
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = [
    o.strip() for o in _env("LAZYCAT_CSRF_TRUSTED_ORIGINS").split(",") if o.strip()
]
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_AGE = 14 * 24 * 3600
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

INSTALLED_APPS = [
    "daphne",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "axes",
    "lazycat.core",
    "lazycat.devices",
    "lazycat.services",
]

MIDDLEWARE = [
    "lazycat.core.middleware.RequestLogMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "lazycat.core.middleware.ContentSecurityPolicyMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "lazycat.core.middleware.SetupRequiredMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "axes.middleware.AxesMiddleware",
]

AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
LOGIN_URL = "core:login"
LOGIN_REDIRECT_URL = "core:dashboard"
LOGOUT_REDIRECT_URL = "core:login"

# Login lockout (django-axes): 5 failures per user name and address lock that pair for 15 minutes.
AXES_FAILURE_LIMIT = _env_int("LAZYCAT_LOGIN_FAILURE_LIMIT", 5, 1, 1000)
AXES_COOLOFF_TIME = _env_int("LAZYCAT_LOGIN_COOLOFF_MINUTES", 15, 1, 10_000) / 60
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "core/locked_out.html"
AXES_VERBOSE = False

ROOT_URLCONF = "lazycat.urls"
ASGI_APPLICATION = "lazycat.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "lazycat.core.context_processors.box",
            ],
        },
    },
]

_sqlite_default = f"sqlite:///{DATA_DIR / 'lazycat.sqlite3'}"
try:
    DATABASES: dict[str, Any] = {
        "default": dj_database_url.parse(_env("DATABASE_URL") or _sqlite_default, conn_max_age=0)
    }
except ValueError as exc:
    raise ImproperlyConfigured(
        f"DATABASE_URL: {exc}; expected e.g. postgres://user:pass@host/db"
    ) from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web, the workers and transportd read while one of them writes; IMMEDIATE
    # transactions take the write lock up front so two writers queue instead of deadlocking.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": 10},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = _env("LAZYCAT_TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = DEBUG

# --- Redis: the Celery broker, the channel layer and the cache --------------------------------
# Without REDIS_URL, `lazycat up` starts the packaged redis-server on a unix socket in DATA_DIR.
REDIS_SOCKET = DATA_DIR / "redis.sock"
REDIS_EMBEDDED = not _env("REDIS_URL")
REDIS_URL = _env("REDIS_URL") or f"unix://{REDIS_SOCKET}"
if urlparse(REDIS_URL).scheme not in {"redis", "rediss", "unix"}:
    raise ImproperlyConfigured(
        f"REDIS_URL={REDIS_URL!r}: expected redis://host:port/db, rediss://… or unix:///path"
    )


def _redis_db(url: str, db: int) -> str:
    """The same server, another logical database (unix sockets take ?db=)."""
    if url.startswith("unix://"):
        return f"{url.split('?')[0]}?db={db}"
    parsed = urlparse(url)
    return parsed._replace(path=f"/{db}").geturl()


CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        # receive() blocks in BZPOPMIN for 5 s (channels_redis brpop_timeout); redis-py 8.1
        # gives every read a 5 s socket timeout by default, which would end every wait in an error.
        "CONFIG": {
            "hosts": [{"address": _redis_db(REDIS_URL, 1), "socket_timeout": 15}],
            "capacity": 500,
            "expiry": 30,
        },
    }
}
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": _redis_db(REDIS_URL, 2),
        "KEY_PREFIX": "lazycat",
    }
}

# kombu names a unix socket its own way: redis+socket:///path, the database as virtual_host.
CELERY_BROKER_URL = (
    f"redis+socket://{urlparse(REDIS_URL).path}?virtual_host=0"
    if REDIS_URL.startswith("unix://")
    else _redis_db(REDIS_URL, 0)
)
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    "expire-pairing-codes": {"task": "lazycat.devices.tasks.expire_pairing_codes", "schedule": 300},
    "expire-approvals": {"task": "lazycat.devices.tasks.expire_approvals", "schedule": 30},
    "mark-stale-devices-offline": {
        "task": "lazycat.devices.tasks.mark_stale_devices_offline",
        "schedule": 30,
    },
    "check-box-network": {"task": "lazycat.core.tasks.check_box_network", "schedule": 600},
}

# --- lazycat ----------------------------------------------------------------------------------
try:
    LAZYCAT_RELAYS = parse_relays(_env("LAZYCAT_RELAYS"))
except BundleError as exc:
    raise ImproperlyConfigured(f"LAZYCAT_RELAYS: {exc}") from None
# How long a pairing code stays valid.
LAZYCAT_PAIRING_TTL = _env_int("LAZYCAT_PAIRING_TTL", 600, 60, 7 * 24 * 3600)
# Pairing requests allowed per source address per minute before refusing.
LAZYCAT_PAIRING_RATE = _env_int("LAZYCAT_PAIRING_RATE", 10, 1, 10_000)
# A device whose last handshake is older than this is shown offline.
LAZYCAT_OFFLINE_AFTER = _env_int("LAZYCAT_OFFLINE_AFTER", 180, 10, 86_400)
# /metrics is served only with this key (Authorization: Bearer <key>); unset = /metrics is off.
LAZYCAT_METRICS_KEY = _env_secret("LAZYCAT_METRICS_KEY")
# The tunnel daemon's (transportd) UDP socket: devices and relays reach the box here. [::] is
# dual-stack (IPv4 too); the port goes into pairing codes as the box's LAN address.
LAZYCAT_TUNNEL_LISTEN = _listen(
    _env("LAZYCAT_TUNNEL_LISTEN", "[::]:7483"), "LAZYCAT_TUNNEL_LISTEN", 7483
)
# The device control socket (docs/negotiation.md): the web process also listens on [::] at
# this port and serves there only /control/, only to approved devices arriving through the
# tunnel at the box's overlay address. 0 turns it off (devices then stay on the relay).
LAZYCAT_CONTROL_PORT = _env_int("LAZYCAT_CONTROL_PORT", 7480, 0, 65535)
if LAZYCAT_CONTROL_PORT and LAZYCAT_CONTROL_PORT == LISTEN_PORT:
    raise ImproperlyConfigured(
        f"LAZYCAT_CONTROL_PORT={LAZYCAT_CONTROL_PORT} is the console's port (LAZYCAT_LISTEN): "
        "pick another, the device control socket must not share the console's"
    )
# Ask the box's router for a UDP port mapping (PCP, NAT-PMP, UPnP IGD) for the tunnel's port.
LAZYCAT_PORTMAP = _env_bool("LAZYCAT_PORTMAP", True)
# How transportd reaches a relay that does not answer over UDP within 5 s of starting (the box's
# network blocks UDP): tcp, tls, ws, wss (the relay's same host:port), or off.
LAZYCAT_RELAY_FALLBACK = _env("LAZYCAT_RELAY_FALLBACK", "tcp").lower()
if LAZYCAT_RELAY_FALLBACK not in {"tcp", "tls", "ws", "wss", "off"}:
    raise ImproperlyConfigured(
        f"LAZYCAT_RELAY_FALLBACK={LAZYCAT_RELAY_FALLBACK!r}: expected tcp, tls, ws, wss or off"
    )
# Open the TUN interface lzc0 (needs CAP_NET_ADMIN); without it pairing and paths still work.
LAZYCAT_TUNNEL_TUN = _env_bool("LAZYCAT_TUNNEL_TUN", True)
# Forward devices' packets to the services the console exposes (nftables + a userspace
# forwarder for targets without IPv6: docs/forwarding.md). Needs the TUN and CAP_NET_ADMIN.
LAZYCAT_FORWARDING = _env_bool("LAZYCAT_FORWARDING", True)
# The forwarder's transparent-proxy port (nftables TPROXY sends service traffic for targets
# without IPv6 here; it answers nothing else).
LAZYCAT_FORWARDER_PORT = _env_int("LAZYCAT_FORWARDER_PORT", 7481, 1, 65535)
# The box's static X25519 key pair; the private half never leaves this file.
LAZYCAT_BOX_KEY_FILE = DATA_DIR / "box.key"
# The box's Ed25519 key for the relay tickets it signs (pairing codes carry a pairing ticket).
LAZYCAT_TICKET_KEY_FILE = DATA_DIR / "ticket.key"

LOG_LEVEL = _env("LAZYCAT_LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
    raise ImproperlyConfigured(f"LAZYCAT_LOG_LEVEL={LOG_LEVEL!r}: expected debug, info, warning")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"logfmt": {"()": "transport.logfmt.LogfmtFormatter"}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
            "formatter": "logfmt",
        }
    },
    "root": {"handlers": ["stdout"], "level": LOG_LEVEL},
    "loggers": {
        # Daphne's access log carries paths only; pairing secrets never travel in a URL.
        "django.server": {"level": "WARNING"},
        "axes": {"level": "WARNING"},
    },
}
