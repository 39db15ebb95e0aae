"""balloonlab: test your service under ballooning (public API; filled in below)."""
