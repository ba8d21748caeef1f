using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace Vmsnap.Cli;

/// <summary>Shared command-line plumbing: error handling, exit codes, JSON, sizes.</summary>
internal static class Cli
{
    internal const int ExitOk = 0, ExitFailure = 1, ExitUsage = 2;

    internal static readonly JsonSerializerOptions Json = new()
    {
        WriteIndented = true,
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
        Converters = { new JsonStringEnumConverter(JsonNamingPolicy.SnakeCaseLower) },
    };

    internal static int Invoke(RootCommand root, string[] args)
    {
        ParseResult parsed = root.Parse(args);
        if (parsed.Errors.Count > 0 && parsed.Action is not System.CommandLine.Help.HelpAction)
        {
            // One line: the parser's messages may list choices on several lines.
            string message = string.Join(' ', parsed.Errors[0].Message.Split((char[])['\n', '\r', '\t'], StringSplitOptions.RemoveEmptyEntries).Select(p => p.Trim()));
            Console.Error.WriteLine($"vmsnap: {message}");
            return ExitUsage;
        }
        return parsed.Invoke(new InvocationConfiguration { ProcessTerminationTimeout = TerminationGrace });
    }

    /// <summary>
    /// How long a command may take to clean up after Ctrl-C or SIGTERM before the process ends anyway:
    /// long enough for a cancelled save to free what it wrote and flush (a cut cleanup is crash-safe,
    /// but may leak clusters).
    /// </summary>
    internal static readonly TimeSpan TerminationGrace = TimeSpan.FromSeconds(60);

    /// <summary>The --json option every command takes.</summary>
    internal static Option<bool> JsonOption() => new("--json") { Description = "Print the result as JSON on stdout" };

    /// <summary>
    /// Sets a command's action, turning vmsnap's errors into one line on stderr and a non-zero exit code.
    /// The action runs on its own task: System.CommandLine installs its Ctrl-C/SIGTERM handler (which
    /// cancels the token and waits <see cref="TerminationGrace"/>) only once the action has returned
    /// its task, so an action that ran to completion inside the call could not be cancelled at all.
    /// </summary>
    internal static void SetHandler(this Command command, Func<ParseResult, CancellationToken, int> action)
    {
        command.SetAction((parseResult, cancellationToken) => Task.Run(() =>
        {
            try
            {
                return action(parseResult, cancellationToken);
            }
            catch (Exception e) when (e is VmsnapException or IOException or UnauthorizedAccessException or OperationCanceledException or ArgumentException or FormatException)
            {
                string message = e is OperationCanceledException ? "cancelled" : e.Message.ReplaceLineEndings(" ");
                Console.Error.WriteLine($"vmsnap: {message}");
                return ExitFailure;
            }
        }, CancellationToken.None));
    }

    internal static void WriteJson<T>(T value) => Console.Out.WriteLine(JsonSerializer.Serialize(value, Json));

    /// <summary>Parses a size like qemu-img does: bytes, or a number with k/K, M, G, T (powers of 1024), optionally followed by B.</summary>
    internal static long ParseSize(string text)
    {
        string s = text.Trim();
        if (s.EndsWith('B') || s.EndsWith('b')) s = s[..^1];
        long multiplier = 1;
        if (s.Length > 0 && char.IsLetter(s[^1]))
        {
            multiplier = char.ToUpperInvariant(s[^1]) switch
            {
                'K' => 1L << 10,
                'M' => 1L << 20,
                'G' => 1L << 30,
                'T' => 1L << 40,
                'P' => 1L << 50,
                _ => throw new FormatException($"invalid size '{text}': unknown suffix '{s[^1]}'"),
            };
            s = s[..^1];
        }
        if (!decimal.TryParse(s, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out decimal number) || number < 0)
            throw new FormatException($"invalid size '{text}'");
        if (number > long.MaxValue / multiplier || number * multiplier != decimal.Truncate(number * multiplier))
            throw new FormatException($"invalid size '{text}': not a whole number of bytes within range");
        return (long)(number * multiplier);
    }

    /// <summary><see cref="ParseSize"/> for sizes that must fit in 32 bits (cluster and buffer sizes).</summary>
    internal static int ParseInt32Size(string text)
    {
        long bytes = ParseSize(text);
        if (bytes > int.MaxValue) throw new FormatException($"invalid size '{text}': at most {int.MaxValue} bytes");
        return (int)bytes;
    }

    /// <summary>Formats a byte count the way qemu-img does (e.g. "64 MiB").</summary>
    internal static string FormatSize(long bytes)
    {
        string[] units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        double v = bytes;
        int u = 0;
        while (v >= 1024 && u < units.Length - 1) { v /= 1024; u++; }
        if (u == 0) return $"{bytes} B";
        return v >= 100 || v == Math.Floor(v) ? $"{v:0.###} {units[u]}" : $"{v:0.##} {units[u]}";
    }
}
