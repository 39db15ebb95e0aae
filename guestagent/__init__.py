"""balloonlab guestagent."""
