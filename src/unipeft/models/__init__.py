"""unipeft.models"""
