"""lazycat transport: the sans-IO tunnel, relay and client core (never imports Django)."""
