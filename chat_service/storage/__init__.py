"""Conversation storage: the `ConversationStore` interface and its SQLAlchemy implementation."""
