"""unipeft.train"""
