"""Storage of the chat service: the `ConversationStore` and `JobStore` interfaces (`base`) and their
SQLAlchemy implementations on one database (`sql`)."""
