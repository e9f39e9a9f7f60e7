"""The semantic response cache: serve a stored answer when a new question means the same as a stored one."""
