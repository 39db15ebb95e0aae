"""balloonlab's pytest plugin (filled in below)."""
