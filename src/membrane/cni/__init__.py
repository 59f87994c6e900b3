"""The CNI plugin and CNI types. Imports nothing beyond the standard library."""
