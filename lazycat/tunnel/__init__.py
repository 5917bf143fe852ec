"""transportd's adapter: the only place where Django meets the tunnel (``transport/``).

``python -m lazycat.tunnel`` (or ``lazycat run transportd``) runs :func:`daemon.run`.
"""
