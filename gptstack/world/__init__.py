"""The embedded default world: data every Python install carries, built deterministically."""
