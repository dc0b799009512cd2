"""Edges of the service: each adapter translates, none decides."""
