"""Loading a model for generation and generating with it: chat format, generation rules, the decoding loop, GGUF
files (as model folders, or on llama.cpp), the consultation's triage rules and the terminal chat."""
