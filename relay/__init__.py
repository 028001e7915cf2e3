"""The relay daemon: pairs senders with receivers and pipes their encrypted bytes blindly."""
