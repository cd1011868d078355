"""Speech out (docs/speech_out.md): audio codecs that turn waves into discrete frames and back, a
speech synthesiser for the tiny world's spoken answers, a word matcher that scores spoken audio, and
the talker that predicts codec frames from the thinker."""
