"""Small datasets shipped with pet_fast (used by ``pet-fast finetune``)."""
