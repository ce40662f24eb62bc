"""Utilities a Twisted program reaches for: components and adapters."""
