"""Editing methods behind one protocol: memit, rome, ft, dinm, aura."""
