"""Models: loading teachers and students, building a student for another tokenizer, capturing states."""
