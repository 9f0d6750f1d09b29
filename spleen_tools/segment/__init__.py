"""Segment new CT scans with an exported model bundle: input checks, the bundle's inference, measures, overlays."""
