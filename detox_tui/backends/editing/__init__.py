"""Editing methods behind one protocol: memit, alphaedit, rome, ft, dinm, aura."""
