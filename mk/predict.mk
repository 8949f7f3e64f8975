# emo-predict on a real sample video with explanations, then a screenshot of the HTML index (needs chromium).
PREDICT_VIDEO ?= $(SAMPLES)/WolfgangLanger_Pexels.mp4
PREDICT_OUT   ?= runs/predict

.PHONY: predict-sample

predict-sample: $(STAMP) sample-data
	.venv/bin/emo-predict $(PREDICT_VIDEO) --explain --out $(PREDICT_OUT)
	@if command -v chromium >/dev/null; then \
	  scripts/screenshot_html.sh $(PREDICT_OUT)/explain/index.html $(PREDICT_OUT)/explain/index.png 1200x500; \
	else echo "chromium not installed: open $(PREDICT_OUT)/explain/index.html in a browser"; fi
