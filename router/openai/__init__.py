"""The OpenAI API over the engine, one module per endpoint.

completions.py and chat.py turn a request into one engine request per choice
(generation.py submits them and merges their outputs) and answer with a body
or a stream of chunks (sse.py); tokenize.py and models.py answer from the
tokenizer and the model's name alone. Every body is a model in responses.py;
streamed chunks, built per token, are the plain dicts those models dump to
(chunks.py builds them; a test holds them to the models). served_model.py
holds what all endpoints check requests against.
"""
