"""Putting a real host in service (``membrane install``/``uninstall``) and support dumps (``sysdump``)."""
