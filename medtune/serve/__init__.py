"""OpenAI-compatible chat API and the symptom-consultation web page (`medtune-serve`)."""
