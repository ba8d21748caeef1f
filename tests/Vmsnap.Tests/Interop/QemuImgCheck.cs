using System.Text.Json;

namespace Vmsnap.Tests.Interop;

/// <summary>
/// What <c>qemu-img check --output=json</c> found in an image, read from its JSON fields (never from its English
/// text): the one way tests ask QEMU whether an image is sound. Exit codes are qemu-img's: 0 clean, 1 the check
/// could not finish, 2 corruptions, 3 leaks only.
/// </summary>
internal sealed class QemuImgCheck
{
    private readonly JsonElement? _json;

    private QemuImgCheck(string image, int exitCode, JsonElement? json, string stderr) =>
        (Image, ExitCode, _json, Stderr) = (image, exitCode, json, stderr);

    public string Image { get; }

    public int ExitCode { get; }

    /// <summary>qemu-img's JSON (fails when it printed none: a check that could not start).</summary>
    public JsonElement Json => _json ?? throw new InvalidOperationException($"qemu-img check {Image} printed no JSON (exit {ExitCode}): {Stderr}");

    /// <summary>qemu-img's JSON, or null when it printed none.</summary>
    public JsonElement? JsonOrNull => _json;

    public string Stderr { get; }

    public long Corruptions => Field("corruptions");

    public long Leaks => Field("leaks");

    public long CheckErrors => Field("check-errors");

    /// <summary>A field of the JSON (absent: 0, as qemu-img leaves out the zero counts).</summary>
    public long Field(string name) => Field(Json, name);

    /// <summary>A count field of qemu-img check's JSON (absent: 0).</summary>
    public static long Field(JsonElement json, string name) => json.TryGetProperty(name, out JsonElement v) ? v.GetInt64() : 0;

    /// <summary>Runs qemu-img check (with <paramref name="options"/>, e.g. <c>-r all</c>) and requires it finished (exit 0, 2 or 3).</summary>
    public static QemuImgCheck Of(string image, params string[] options)
    {
        QemuImgCheck c = Attempt(image, options);
        Assert.True(c.ExitCode is 0 or 2 or 3 && c._json is not null, $"qemu-img check {image} failed ({c.ExitCode}): {c.Stderr}");
        return c;
    }

    /// <summary>Runs qemu-img check, whatever it exits with.</summary>
    public static QemuImgCheck Attempt(string image, params string[] options)
    {
        Tool.Result r = Tool.Run("qemu-img", ["check", "--output=json", .. options, image]);
        JsonElement? json = r.Stdout.TrimStart().StartsWith('{') ? JsonDocument.Parse(r.Stdout).RootElement : null;
        return new QemuImgCheck(image, r.ExitCode, json, r.Stderr);
    }

    /// <summary>Asserts qemu-img check finds no corruption, no leak and no error.</summary>
    public static void AssertClean(string image)
    {
        QemuImgCheck c = Of(image);
        Assert.True(c.ExitCode == 0 && c.Corruptions == 0 && c.Leaks == 0 && c.CheckErrors == 0, c.ToString());
    }

    public void Deconstruct(out JsonElement json, out int exitCode) => (json, exitCode) = (Json, ExitCode);

    public void Deconstruct(out long corruptions, out long leaks, out long checkErrors, out int exitCode, out string text) =>
        (corruptions, leaks, checkErrors, exitCode, text) = (Corruptions, Leaks, CheckErrors, ExitCode, ToString());

    public override string ToString() => $"qemu-img check {Image}: exit {ExitCode}, {_json?.ToString() ?? "no JSON"}\n{Stderr}";
}
