"""balloonlab hostd."""
